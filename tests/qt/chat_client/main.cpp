// Chat client as in the tutorials: writes its message with no newline
// (m_tcp->write(sendMsg.toUtf8())) once someone else is in the room, and prints the first
// message it receives from someone else. Usage: chat_client HOST PORT MESSAGE.
// Exit 0 after printing that message, 1 on error or after 10 s.
#include <QCoreApplication>
#include <QTcpSocket>
#include <QTimer>
#include <cstdio>

int main(int argc, char *argv[])
{
    QCoreApplication app(argc, argv);
    QStringList args = app.arguments();
    if (args.size() != 4) {
        fprintf(stderr, "usage: chat_client HOST PORT MESSAGE\n");
        return 2;
    }
    QString sendMsg = args[3];
    bool sentOnce = false;
    QTcpSocket *m_tcp = new QTcpSocket(&app);
    auto send = [&]() {
        if (!sentOnce) {
            sentOnce = true;
            m_tcp->write(sendMsg.toUtf8());
        }
    };
    QObject::connect(m_tcp, &QTcpSocket::readyRead, [&]() {
        while (m_tcp->canReadLine()) {
            QByteArray line = m_tcp->readLine();
            // "* welcome …; here: …" or "* … joined": someone else is in the room.
            if (line.startsWith("* ")) {
                if (line.contains("joined") || line.contains("here: ["))
                    send();
                continue;
            }
            fwrite(line.constData(), 1, line.size(), stdout);
            fflush(stdout);
            send();
            // Stay a moment so the other side's message is not cut by our leaving.
            QTimer::singleShot(300, [&]() { app.exit(0); });
        }
    });
    QObject::connect(m_tcp, &QTcpSocket::errorOccurred, [&]() {
        fprintf(stderr, "socket error: %s\n", qPrintable(m_tcp->errorString()));
        app.exit(1);
    });
    QTimer::singleShot(10000, [&]() {
        fprintf(stderr, "timed out\n");
        app.exit(1);
    });
    m_tcp->connectToHost(args[1], args[2].toUShort());
    return app.exec();
}
