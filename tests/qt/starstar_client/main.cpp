// The file client of the tutorial (seeds/004), unchanged in what it puts on the wire: on
// connecting it writes "filename**filesize", starts a 20 ms QTimer "to avoid sticky packets",
// then writes the file in 4 KiB pieces and disconnects. It never reads.
// Usage: starstar_client HOST PORT FILE. Exit 0 once it has sent everything and disconnected.
#include <QCoreApplication>
#include <QDebug>
#include <QFile>
#include <QFileInfo>
#include <QTcpSocket>
#include <QTimer>

int main(int argc, char *argv[])
{
    QCoreApplication app(argc, argv);
    QStringList args = app.arguments();
    if (args.size() != 4) {
        qDebug() << "usage: starstar_client HOST PORT FILE";
        return 2;
    }
    QString filepath = args[3];
    QFileInfo FileData(filepath);
    QString filename = FileData.fileName(); // 文件名称
    qint64 filesize = FileData.size();      // 文件大小
    QFile file(filepath);
    if (!file.open(QIODevice::ReadOnly)) {
        qDebug() << "cannot open" << filepath;
        return 1;
    }
    QTcpSocket *m_tcp = new QTcpSocket(&app);
    QTimer *myTimer = new QTimer(&app);
    QObject::connect(myTimer, &QTimer::timeout, [&]() {
        myTimer->stop(); // 关闭定时器
        qint64 sendSize = 0;
        qint64 len;
        do {
            char buf[4 * 1024] = {0};
            len = file.read(buf, sizeof(buf)); // 每次读取的空间
            m_tcp->write(buf, len);
            sendSize += len;
        } while (len > 0);
        if (sendSize == filesize) {
            qDebug() << "文件发送成功";
            file.close();
            m_tcp->disconnectFromHost();
            m_tcp->close();
        }
    });
    QObject::connect(m_tcp, &QTcpSocket::connected, [&]() {
        // 文件名**文件大小
        QString head = filename + "**" + QString::number(filesize);
        qint64 length = m_tcp->write(head.toUtf8());
        if (length > 0)
            myTimer->start(20); // 20毫秒之后再发，避免粘包
        else
            app.exit(1);
    });
    QObject::connect(m_tcp, &QTcpSocket::disconnected, [&]() { app.exit(0); });
    QTimer::singleShot(30000, [&]() {
        qDebug() << "timed out";
        app.exit(1);
    });
    m_tcp->connectToHost(args[1], args[2].toUShort());
    return app.exec();
}
